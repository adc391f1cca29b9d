"""Small real models the demo and the simulators train in seconds on scikit-learn's bundled data."""
