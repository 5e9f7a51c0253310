from divingbell.entry import main

main()
