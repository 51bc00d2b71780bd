"""`python -m reference.check NN PATH`: see reference/check/__init__.py."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
