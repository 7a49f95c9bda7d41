from ecomaug.cli import main

main()
