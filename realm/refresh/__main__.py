import sys

from realm.refresh.cli import main

sys.exit(main())
