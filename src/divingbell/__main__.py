from divingbell.cli import main

main()
