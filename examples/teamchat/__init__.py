"""A team chat with JWT: every hook of wscluster.App in one small application."""
