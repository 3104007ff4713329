"""Where the tests' own files are, for test modules in any subfolder of tests/."""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT_DIR = TESTS_DIR.parent
