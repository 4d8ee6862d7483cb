"""Every change teonspeed makes to another library, one module per library and version range.

Each module checks the installed version against the versions it was written for and refuses others,
and applies its changes at runtime, idempotently (`apply()`); nothing here edits site-packages.
"""
