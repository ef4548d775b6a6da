from nucleiseg.cli import main

main()
