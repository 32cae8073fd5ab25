"""A program for the sslserver tests: writes its environment (NUL-separated entries) to fd 1, then exits."""

import os

os.write(1, b"".join(name + b"=" + value + b"\0" for name, value in os.environb.items()))
