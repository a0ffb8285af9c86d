from comet_ds.cli import main

main()
