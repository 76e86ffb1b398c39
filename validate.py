"""MindCV-compatible entry point: `python validate.py -c CONFIG --data_dir DIR --ckpt_path PATH`."""

import sys

from res2net.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
