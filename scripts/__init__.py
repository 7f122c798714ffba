"""Setup and build scripts (the README names them); a package so the tests can import scripts/compile.py."""
