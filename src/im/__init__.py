"""im: an instant-messaging server. Importing the package first settles which build of its hot modules
runs (im.compiled): the compiled extensions only where they match their source."""

from im import compiled as _compiled

_compiled.select()
