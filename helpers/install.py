"""`python -m helpers.install`: install llama-cpp-python for this machine (the Makefile's and Colab's entry
point, run before llama-cpp-python exists). The installer itself is `helpers.machine.install`."""

import sys

from helpers.machine.install import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
