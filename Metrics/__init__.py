"""How good is a synthetic dataset: metrics computed from image embeddings.

| module | what |
| --- | --- |
| `features.py` | the embedding extractors: InceptionV3 pool features (ImageNet) and a ResNet20 trained on the real data |
| `distribution.py` | Fréchet distance (FID), kernel inception distance (KID, unbiased MMD² with a cubic kernel), Gaussian-kernel MMD² |
| `inception_score.py` | Inception Score from an extractor's class probabilities |
| `prdc.py` | precision, recall, density, coverage (k-nearest neighbours, Naeem et al. 2020) |
| `memorization.py` | nearest real training image of each synthetic image; suspected copies |
| `quality.py` | all of the above, overall and per class, for a folder of images → a result dict |
| `cas.py` | classification accuracy score (CAS): a classifier trained on synthetic data, tested on real |
| `rating_stats.py` | a human "real or generated?" study: fooling rate, Wilson interval, rater exclusion, Fleiss' kappa |
| `speckle.py` | colour speckle: the share of pixels whose channels disagree (0 for every real image of a grey dataset) |
"""
