"""Test and fault-injection machinery: used by tests/, tools/ and bench/, never by the service."""
