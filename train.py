"""MindCV-compatible entry point: `python train.py -c CONFIG --data_dir DIR [--distribute False]`."""

import sys

from res2net.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
