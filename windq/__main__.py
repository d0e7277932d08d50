from windq.cli import main

main()
