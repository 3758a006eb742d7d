from livetalk_cli.cli import main

main()
