from dsv3.cli import run

run()
