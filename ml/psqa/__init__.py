"""Patient-specific QA: plan geometry, complexity metrics, the QA simulator and BMMQA."""
