"""The one compiled part: protocols._native (multipart ZeroMQ messages in one call).

Optional: when it does not build (no C compiler, no Python headers), the install goes on
and protocols.transport uses pyzmq's own calls instead (the same behaviour, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocols._native",
            ["protocols/_native.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-missing-braces"],
            libraries=["dl"],
            optional=True,
        )
    ]
)
