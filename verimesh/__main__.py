from verimesh.cli.app import main

main()
