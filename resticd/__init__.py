"""
resticd: a restic REST backend server built on Twisted.
"""

__version__ = "0.1.0"
