from .activation import ActivationState
from .model import SwiftModel
from .swift import Swift

__all__ = ["ActivationState", "Swift", "SwiftModel"]
