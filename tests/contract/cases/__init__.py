"""Every module in this folder defines ``CASES: list[ContractCase]``; one file per tuner."""

import importlib
import pkgutil

ALL_CASES = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    ALL_CASES.extend(importlib.import_module(f"{__name__}.{_info.name}").CASES)
