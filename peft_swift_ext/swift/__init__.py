from .model import SwiftModel
from .swift import Swift

__all__ = ["Swift", "SwiftModel"]
