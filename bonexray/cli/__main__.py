from bonexray.cli import main

main()
