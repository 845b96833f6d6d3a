# setuptools needs this file only to hand the cffi build script to setup(): the
# native module (syscall wrappers + the PIE restorer) is compiled at install time.
from setuptools import setup

setup(cffi_modules=["criu_py/native/build.py:ffibuilder"])
