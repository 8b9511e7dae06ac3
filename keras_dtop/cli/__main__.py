import sys

from keras_dtop.cli import main

sys.exit(main())
