"""The one thing pyproject.toml cannot declare stably: fgh's compiled search kernel.

fgh_deploy/_hamming.c fuses the Hamming search's xor, popcount and sum (at 128 bits, 2-3x
numpy's separate passes, measured). It is optional: without a C compiler the install goes on
and fgh_deploy.search runs on numpy alone, with the same results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("fgh_deploy._hamming", ["fgh_deploy/_hamming.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
