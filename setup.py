"""setup.cfg holds the metadata; this file adds the one C extension, ucspi.server._spawn.

optional=True: where no C compiler is found, the install goes on without it and tcpserver
starts its programs through posix_spawn and ctypes (`tcpserver --version` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ucspi.server._spawn",
            sources=["ucspi/server/_spawn.c"],
            extra_compile_args=["-O2", "-Wall"],
            optional=True,
        )
    ]
)
