# The one place the version is written: setup.py reads this file, xent_ext.__version__ imports it.
__version__ = "0.2.0.dev0"
