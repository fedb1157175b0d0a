"""`python -m dense_model.data.preprocess`: the same as toolkits/pretrain_data_preprocessing/preprocess_data.py."""

import sys

from dense_model.data.preprocess.cli import main

sys.exit(main())
