"""Model definitions reportgen can run: see trm.py."""
