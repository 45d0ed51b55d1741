from everseg.cli import main

main()
