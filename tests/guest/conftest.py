from tests.guest.fixtures import guest_kernel, start_guest

__all__ = ["guest_kernel", "start_guest"]
