from tlimage.cli import entry

entry()
