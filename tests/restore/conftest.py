from tests.guest.fixtures import guest_kernel

__all__ = ["guest_kernel"]
