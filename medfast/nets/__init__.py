from medfast.nets.registration import GlobalNet, LocalNet

__all__ = ["GlobalNet", "LocalNet"]
