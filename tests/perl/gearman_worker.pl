#!/usr/bin/perl
# A Gearman::Worker (Debian's libgearman-client-perl) serving one function over TLS: the Perl
# worker of tests/test_interop_tls.py. It answers each job with the workload reversed.
#
#   perl gearman_worker.pl --port N [--ca CA.pem] [--cert CERT.pem --key KEY.pem] FUNCTION
#
# Prints "registered" once its CAN_DO is sent (the server does not acknowledge CAN_DO: the test
# waits for the function's worker count in the admin status), then "ran: <workload>" as each
# job starts. Runs until stopped; if the library dies (as it does on an ERROR packet) it
# prints "died: <message>" and exits 1.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use Gearman::Worker;
use TlsJobServer qw(parse_options job_server);

my $option = parse_options('--port N [--ca F] [--cert F --key F] FUNCTION', []);
@ARGV == 1 or die "usage: $0 [options] FUNCTION\n";
my ($function) = @ARGV;
$| = 1;

my $worker = Gearman::Worker->new(job_servers => [job_server($option)]);
$worker->register_function(
    $function => sub {
        my $workload = $_[0]->arg;
        print "ran: $workload\n";
        return scalar reverse $workload;
    }
) or do { print "died: cannot connect or register\n"; exit 1 };
print "registered\n";

eval { $worker->work() while 1; 1 } or do {
    my $why = $@;
    $why =~ s/\s+\z//;
    print "died: $why\n";
    exit 1;
};
