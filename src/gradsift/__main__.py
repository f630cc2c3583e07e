from gradsift.cli import main

main()
