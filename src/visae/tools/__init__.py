"""Tools that are not stages of the data flow: benches, the docker launcher, a planted-feature store."""
