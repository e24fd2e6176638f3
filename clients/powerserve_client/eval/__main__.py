import sys

from powerserve_client.eval.cli import main

sys.exit(main())
