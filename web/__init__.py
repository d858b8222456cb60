"""
The web face of rqtwisted: a klein resource for the HTML UI and the JSON API.
"""
