"""`python -m alnus` (also what torchrun launches: `torchrun ... -m alnus train ...`)."""

from alnus.cli import main

main()
