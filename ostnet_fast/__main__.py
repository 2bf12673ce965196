"""`python -m ostnet_fast` = the `ostnet-fast` command."""
from .cli import main

raise SystemExit(main())
