from drtool.cli.main import run

run()
