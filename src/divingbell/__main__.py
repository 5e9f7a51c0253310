from divingbell.commands.entry import main

main()
