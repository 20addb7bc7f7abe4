"Test configuration: offline, headless, deterministic CPU."
import os

os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['MPLBACKEND'] = 'Agg'
