from damops.cli import main

main()
