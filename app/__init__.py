"""saekit.app"""
