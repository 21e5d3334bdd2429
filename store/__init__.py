"""The activation store: format, writer, reader, shuffled loader, statistics.

Data flows one way: store/ never imports from pipeline/.
"""
