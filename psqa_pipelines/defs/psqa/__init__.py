"""PSQA domain: RT Plan QA data -> complexity features, gamma labels, split, pack -> BMMQA and
baselines -> evaluation, Shapley report, champion/challenger promotion; retraining schedule."""
